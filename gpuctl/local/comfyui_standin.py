"""A CPU stand-in for ComfyUI that speaks ComfyUI's HTTP + WebSocket protocol on loopback.

It is what the adapter's tests, ``gpuctl local comfyui`` and the benchmarks talk to instead of a GPU box.
Protocol shapes follow ``reference/comfyui-protocol.md`` (the ComfyUI v0.26 source): ``POST /prompt`` with
ComfyUI's validation errors, one worker that runs one prompt at a time, the WebSocket message sequence
of §9.6, history entries as in §4, ``/view``, ``/upload/image``, ``/queue``, ``/interrupt``,
``/object_info`` and ``/system_stats``. Every route is also served under ``/api``.

Nodes run for real on the CPU with Pillow (see ``standin_nodes``): the output is a greyscale sketch or a
perspective warp of the input image, stamped "gpuctl stand-in". Job duration, sampler steps and faults
(HTTP 500s, WebSocket drops, execution errors, restarts, a slow first job, a late history write) are
configurable at start and switchable at run time through ``POST /_standin/faults``.

The "unified API" of the seed system (``/api/v1/<job>/jobs``) is served too; see ``standin_unified``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import heapq
import io
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from PIL import Image

from gpuctl.local import standin_dirs
from gpuctl.local import standin_nodes as nodes

__all__ = ["DEFAULT_VERSION", "StandinConfig", "StandinFaults", "StandinServer", "build_app", "main", "serve"]

logger = logging.getLogger(__name__)

MAXIMUM_HISTORY_SIZE = 10000
#: The version the stand-in plays by default: the 0.3.x line the GPU box runs (no ``/api/jobs``, legacy error
#: types, any client prompt_id accepted). ``--comfyui-version 0.26.0`` plays the newer server.
DEFAULT_VERSION = "0.3.64"
_SENSITIVE_EXTRA_KEYS = ("api_key_comfy_org", "auth_token_comfy_org")
_LOADERS = frozenset({"CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader", "LoraLoaderModelOnly"})


@dataclass
class StandinFaults:
    """Fault switches. Counters fire on the next N occasions and count down; seconds apply while non-zero.

    * ``fail_http_500``: the next N ``POST /prompt`` answer a plain 500 and queue nothing.
    * ``drop_websocket``: during the next N jobs, every WebSocket is cut (TCP abort) halfway through the job.
    * ``execution_error``: the next N jobs fail at ``execution_error_node`` (a node id or class_type;
      default the first sampler) with ``execution_error_type: execution_error_message``.
    * ``restart``: during the next N jobs, halfway through, the server "restarts": queue, history, cache
      and the prompt counter are forgotten, every WebSocket drops, and the running prompt never reaches
      history. ``restart_downtime_s`` keeps the port closed that long (only when the server runs through
      ``serve``/``StandinServer``).
    * ``slow_first_job_s``: extra seconds spent in the first model loader of the first job after start, after
      a restart, or after ``POST /free {"unload_models": true}``. Setting it at run time also unloads the
      models, so the next job is the slow one.
    * ``history_delay_s``: delay between ``execution_success``/``error``/``interrupted`` and the history
      write, which widens ComfyUI's "success before history" race (reference §10.1).
    * ``stale_ws_cleanup``: reproduce ComfyUI's stale-socket bug: when an old socket with the same clientId
      closes after a reconnect, its cleanup de-registers the *new* socket (reference §9.1).
    * ``interrupt_lag_s``: an interrupt is honoured, as in ComfyUI, only where the worker checks for it — when a
      node starts and at each progress step — and, with this set, only at the first such check at least this
      many seconds after it was asked for: the stand-in's way to play a long node without a progress bar.
    """

    fail_http_500: int = 0
    drop_websocket: int = 0
    execution_error: int = 0
    execution_error_node: str | None = None
    execution_error_message: str = "gpuctl stand-in: injected failure"
    execution_error_type: str = "RuntimeError"
    restart: int = 0
    restart_downtime_s: float = 0.0
    slow_first_job_s: float = 0.0
    history_delay_s: float = 0.0
    stale_ws_cleanup: bool = False
    interrupt_lag_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``changes`` (field name -> value); raise ValueError on an unknown name or a bad value."""
        known = {f.name: f for f in dataclasses.fields(self)}
        staged: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(known))}")
            staged[name] = _coerce_fault(name, value, getattr(self, name))
        for name, value in staged.items():
            setattr(self, name, value)


def _coerce_fault(name: str, value: Any, current: Any) -> Any:
    if name in ("execution_error_node",):
        if value is None or isinstance(value, str):
            return value
    elif isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int) and value >= 0:
            return value
    elif isinstance(current, float):
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
    elif isinstance(current, str) and isinstance(value, str) and value:
        return value
    raise ValueError(f"bad value for fault {name!r}: {value!r}")


def _default_models() -> dict[str, list[str]]:
    return {k: list(v) for k, v in nodes.DEFAULT_MODELS.items()}


@dataclass
class StandinConfig:
    """How the stand-in runs. Directories default to a fresh temporary directory.

    ``seconds_per_job`` is spread over the nodes that actually run (each sampler step counts as one node);
    ``steps`` overrides how many ``progress`` events a sampler sends (default: its ``steps`` input).
    ``output_bucket``/``output_prefix``/``cdn_domain``/``s3_endpoint_url``/``unified_blocking`` only matter to
    the unified API routes (see ``standin_unified``).
    """

    host: str = "127.0.0.1"
    port: int = 8188
    seconds_per_job: float = 2.0
    steps: int | None = None
    input_dir: Path | None = None
    output_dir: Path | None = None
    temp_dir: Path | None = None
    comfyui_version: str = DEFAULT_VERSION
    models: dict[str, list[str]] = field(default_factory=_default_models)
    save_metadata: bool = True
    cache: bool = True
    max_upload_size: int = 100 * 1024 * 1024
    faults: StandinFaults = field(default_factory=StandinFaults)
    output_bucket: str | None = None
    output_prefix: str = "results/"
    cdn_domain: str | None = None
    s3_endpoint_url: str | None = None
    unified_blocking: bool = False


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Interrupted(Exception):
    pass


class _Restarted(Exception):
    pass


@dataclass
class _QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_list(self) -> list[Any]:
        """The 5-element queue/history array; sensitive extra_data keys left out."""
        extra = {k: v for k, v in self.extra_data.items() if k not in _SENSITIVE_EXTRA_KEYS}
        return [self.number, self.prompt_id, self.prompt, extra, self.outputs]


@dataclass
class _Job:
    """Per-run bookkeeping of the prompt being executed."""

    item: _QueueItem
    client_id: str | None
    messages: list[list[Any]] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    ui: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    units_total: int = 0
    units_done: int = 0
    node_s: float = 0.0
    step_s: float = 0.0
    fault_point_fired: bool = False
    drop_ws: bool = False
    restart: bool = False
    error_node: str | None = None


class Standin:
    """The stand-in's state and worker: queue, history, sockets, cache. One per application."""

    def __init__(self, config: StandinConfig, input_dir: Path, output_dir: Path, temp_dir: Path) -> None:
        self.config = config
        self.faults = config.faults
        self.version = _parse_version(config.comfyui_version)
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.temp_dir = temp_dir
        self.catalog = nodes.Catalog(config.models, input_dir, self.version)
        self.number = 0
        self._seq = 0
        self.pending: list[tuple[float, str, int, _QueueItem]] = []
        self.running: _QueueItem | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self._transports: dict[int, asyncio.Transport] = {}
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.cache: dict[str, tuple[tuple[Any, ...], dict[str, Any] | None]] = {}
        self.models_loaded = False
        self.site_control: Callable[[float], Awaitable[None]] | None = None
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any], str | None]] | None = None
        self._wake: asyncio.Event | None = None
        self._interrupt: asyncio.Event | None = None
        self._interrupt_at = 0.0
        self._worker_task: asyncio.Task[None] | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._outbox = asyncio.Queue()
        self._wake = asyncio.Event()
        self._interrupt = asyncio.Event()
        self._publisher_task = asyncio.create_task(self._publisher())
        self._worker_task = asyncio.create_task(self._worker())

    async def stop(self) -> None:
        for task in (self._worker_task, self._publisher_task, *self._background):
            if task is not None:
                task.cancel()
        for task in (self._worker_task, self._publisher_task, *self._background):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.drop_sockets()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def restart(self, downtime_s: float = 0.0) -> None:
        """Forget everything a ComfyUI process keeps in memory, as a crash and restart would (§10.4)."""
        logger.warning("standin.restart", extra={"downtime_s": downtime_s})
        worker = self._worker_task
        if worker is not None and worker is not asyncio.current_task():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        self.pending.clear()
        self.running = None
        self.history.clear()
        self.number = 0
        self.cache.clear()
        self.models_loaded = False
        self.client_id = None
        self.last_node_id = None
        if self._outbox is not None:
            while not self._outbox.empty():
                self._outbox.get_nowait()
        await self.drop_sockets()
        # ComfyUI wipes its temp directory at start-up; inputs and outputs survive.
        for child in self.temp_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        if downtime_s > 0 and self.site_control is not None:
            await self.site_control(downtime_s)
        self._worker_task = asyncio.create_task(self._worker())

    # --- WebSocket plumbing ------------------------------------------------------------------------------

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Queue a message: to every socket when ``sid`` is None, else to that socket only (if connected)."""
        if self._outbox is not None:
            self._outbox.put_nowait((event, data, sid))

    async def _publisher(self) -> None:
        # One FIFO for every message, like ComfyUI's publish_loop, so the §9.6 order holds.
        assert self._outbox is not None
        while True:
            event, data, sid = await self._outbox.get()
            text = json.dumps({"type": event, "data": data})
            targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
            for ws in targets:
                await _send_text(ws, text)

    def register_socket(self, sid: str, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        # Reconnecting with the same clientId replaces the entry; the old socket stays open (§9.1).
        self.sockets[sid] = ws
        if transport is not None:
            self._transports[id(ws)] = transport

    def unregister_socket(self, sid: str, ws: web.WebSocketResponse) -> None:
        self._transports.pop(id(ws), None)
        if self.faults.stale_ws_cleanup or self.sockets.get(sid) is ws:
            self.sockets.pop(sid, None)

    async def drop_sockets(self) -> None:
        """Cut every WebSocket at the TCP level, as a crash or a network drop would."""
        for sid, ws in list(self.sockets.items()):
            transport = self._transports.pop(id(ws), None)
            if transport is not None and not transport.is_closing():
                transport.abort()
            else:
                with contextlib.suppress(Exception):
                    await ws.close()
            self.sockets.pop(sid, None)

    def queue_remaining(self) -> int:
        return len(self.pending) + (1 if self.running is not None else 0)

    def queue_updated(self) -> None:
        self.send("status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}, None)

    # --- queue ---------------------------------------------------------------------------------------------

    def validate(self, prompt: dict[str, Any], partial_targets: list[str] | None = None) -> nodes.ValidationResult:
        return nodes.validate_prompt(prompt, self.catalog, partial_targets)

    def enqueue(
        self, number: float, prompt_id: str, prompt: dict[str, Any], extra: dict[str, Any], outputs: list[str]
    ) -> None:
        item = _QueueItem(number, prompt_id, prompt, extra, outputs)
        self._seq += 1
        heapq.heappush(self.pending, (number, prompt_id, self._seq, item))
        self.queue_updated()
        if self._wake is not None:
            self._wake.set()

    def next_number(self, front: bool) -> int:
        number = self.number
        self.number += 1
        return -number if front else number

    def delete_pending(self, prompt_id: str) -> bool:
        kept = [entry for entry in self.pending if entry[1] != prompt_id]
        if len(kept) == len(self.pending):
            return False
        self.pending = kept
        heapq.heapify(self.pending)
        self.queue_updated()
        return True

    def clear_pending(self) -> None:
        self.pending.clear()
        self.queue_updated()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Global interrupt, or only if ``prompt_id`` is the running prompt; True when it applied."""
        if prompt_id and (self.running is None or self.running.prompt_id != prompt_id):
            logger.info("standin.interrupt_ignored", extra={"prompt_id": prompt_id})
            return False
        assert self._interrupt is not None
        if not self._interrupt.is_set():
            self._interrupt_at = time.monotonic()
        self._interrupt.set()
        return True

    def _check_interrupt(self) -> None:
        """Where ComfyUI's worker looks for an interrupt: a node starting, a progress step."""
        assert self._interrupt is not None
        if self._interrupt.is_set() and time.monotonic() - self._interrupt_at >= self.faults.interrupt_lag_s:
            raise _Interrupted()

    def state_of(self, prompt_id: str) -> str:
        """``pending``, ``running``, ``done`` or ``unknown``."""
        if self.running is not None and self.running.prompt_id == prompt_id:
            return "running"
        if any(entry[1] == prompt_id for entry in self.pending):
            return "pending"
        return "done" if prompt_id in self.history else "unknown"

    # --- worker ------------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        assert self._wake is not None
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            *_, item = heapq.heappop(self.pending)
            self.running = item
            self.queue_updated()
            try:
                await self._execute(item)
            except _Restarted:
                return
            except Exception:
                # A bug in the stand-in itself: keep serving, as ComfyUI's worker would.
                logger.exception("standin.worker_crashed", extra={"prompt_id": item.prompt_id})
                self.running = None
                self.queue_updated()

    def _add_message(self, job: _Job, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        data = {**data, "timestamp": _now_ms()}
        job.messages.append([event, data])
        if job.client_id is not None or broadcast:
            self.send(event, data, job.client_id)

    def _progress_state(self, job: _Job, node_id: str, state: str, value: float = 0, max_: float = 1) -> None:
        job.progress[node_id] = {
            "value": value,
            "max": max_,
            "state": state,
            "node_id": node_id,
            "prompt_id": job.item.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        data = {"prompt_id": job.item.prompt_id, "nodes": copy.deepcopy(job.progress)}
        self.send("progress_state", data, job.client_id)

    def _pick_error_node(self, prompt: Mapping[str, Any], order: list[str]) -> str:
        wanted = self.faults.execution_error_node
        if wanted is not None:
            if wanted in order:
                return wanted
            for node_id in order:
                if prompt[node_id]["class_type"] == wanted:
                    return node_id
        for node_id in order:
            if nodes.progress_steps(prompt[node_id]):
                return node_id
        return order[-1]

    async def _execute(self, item: _QueueItem) -> None:
        assert self._interrupt is not None
        self._interrupt.clear()  # ComfyUI resets the flag when each prompt starts
        prompt_id, prompt = item.prompt_id, item.prompt
        client_id = item.extra_data.get("client_id")
        job = _Job(item=item, client_id=client_id if isinstance(client_id, str) else None)
        self.client_id = job.client_id
        logger.info("standin.prompt_started", extra={"prompt_id": prompt_id})
        self._add_message(job, "execution_start", {"prompt_id": prompt_id})

        order = nodes.execution_order(prompt, item.outputs)
        sigs = await asyncio.to_thread(nodes.node_signatures, prompt, order, self.input_dir)
        if self.config.cache:
            job.cached = [n for n in order if sigs[n] in self.cache]
        self._add_message(job, "execution_cached", {"nodes": job.cached, "prompt_id": prompt_id})
        to_run = [n for n in order if n not in job.cached]
        steps_total = sum(self._steps_of(prompt[n]) for n in to_run)
        job.units_total = len(to_run) + steps_total
        # As on a GPU, sampling takes most of the time: 80 % of the budget goes to sampler steps.
        budget = self.config.seconds_per_job
        if steps_total:
            job.node_s, job.step_s = 0.2 * budget / len(to_run), 0.8 * budget / steps_total
        elif to_run:
            job.node_s = budget / len(to_run)

        # Faults are decided when the job starts, so flipping them mid-job affects the next one.
        if self.faults.drop_websocket > 0 and to_run:
            self.faults.drop_websocket -= 1
            job.drop_ws = True
        if self.faults.restart > 0 and to_run:
            self.faults.restart -= 1
            job.restart = True
        if self.faults.execution_error > 0 and to_run:
            self.faults.execution_error -= 1
            job.error_node = self._pick_error_node(prompt, to_run)

        values: dict[str, tuple[Any, ...]] = {}
        current_node: str | None = None
        success = False
        try:
            for node_id in order:
                node = prompt[node_id]
                if node_id in job.cached:
                    outputs, ui = self.cache[sigs[node_id]]
                    values[node_id] = outputs
                    if nodes.NODES[node["class_type"]].output_node:
                        job.executed.append(node_id)
                        self._record_ui(job, node_id, ui)
                    continue
                current_node = node_id
                await self._run_node(job, node_id, node, values)
                if self.config.cache:
                    self.cache[sigs[node_id]] = (values[node_id], job.ui.get(node_id))
            current_node = None
            self._add_message(job, "execution_success", {"prompt_id": prompt_id})
            success = True
        except _Interrupted:
            node_id = current_node or order[0]
            self._progress_state(job, node_id, "error")
            data = {
                "prompt_id": prompt_id,
                "node_id": node_id,
                "node_type": prompt[node_id]["class_type"],
                "executed": list(job.executed),
            }
            self._add_message(job, "execution_interrupted", data, broadcast=True)
            logger.info("standin.prompt_interrupted", extra={"prompt_id": prompt_id, "node_id": node_id})
        except (_Restarted, asyncio.CancelledError):
            raise
        except Exception as ex:
            node_id = current_node or order[0]
            self._progress_state(job, node_id, "error")
            module = type(ex).__module__
            injected = getattr(ex, "standin_type", None)
            ex_type = injected or (
                type(ex).__qualname__ if module == "builtins" else f"{module}.{type(ex).__qualname__}"
            )
            data = {
                "prompt_id": prompt_id,
                "node_id": node_id,
                "node_type": prompt[node_id]["class_type"],
                "executed": list(job.executed),
                "exception_message": f"{ex}\n",
                "exception_type": ex_type,
                "traceback": traceback.format_tb(ex.__traceback__),
                "current_inputs": nodes.sampler_inputs_summary(prompt[node_id]),
                "current_outputs": list(job.cached),
                "timestamp": _now_ms(),
            }
            self._add_message(job, "execution_error", data)
            logger.info("standin.prompt_failed", extra={"prompt_id": prompt_id, "node_id": node_id})
        finally:
            if self.config.cache:
                keep = set(sigs.values())
                self.cache = {k: v for k, v in self.cache.items() if k in keep}

        if self.faults.history_delay_s > 0:
            await asyncio.sleep(self.faults.history_delay_s)
        self._write_history(job, success)
        self.running = None
        self.last_node_id = None
        self.queue_updated()
        if job.client_id is not None:
            self.send("executing", {"node": None, "prompt_id": prompt_id}, job.client_id)
        # The run's own clock (epoch ms of execution_start and of its end event), for benchmarks reading the log.
        ended = next((m[1]["timestamp"] for m in reversed(job.messages) if m[0] != "execution_cached"), 0)
        logger.info("standin.prompt_done", extra={"prompt_id": prompt_id, "success": success,
                                                  "started_ms": job.messages[0][1]["timestamp"], "ended_ms": ended})

    def _steps_of(self, node: Mapping[str, Any]) -> int:
        steps = nodes.progress_steps(node)
        if steps and self.config.steps is not None and node["class_type"] == "KSampler":
            return max(1, self.config.steps)
        return steps

    def _record_ui(self, job: _Job, node_id: str, ui: dict[str, Any] | None) -> None:
        if job.client_id is not None:
            data = {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": job.item.prompt_id}
            self.send("executed", data, job.client_id)
        if ui is not None:
            job.ui[node_id] = ui

    async def _spend(self, job: _Job, seconds: float, *, step: bool = False) -> None:
        """Spend one unit of the job (a node's work, or a progress step) taking ``seconds``. A node's work is not
        interruptible; a progress step checks for an interrupt at its end, as ComfyUI's progress hook does."""
        if seconds > 0:
            await asyncio.sleep(seconds)
        job.units_done += 1
        if step:
            self._check_interrupt()
        if not job.fault_point_fired and job.units_done * 2 >= job.units_total:
            job.fault_point_fired = True
            await self._midpoint_faults(job)

    async def _midpoint_faults(self, job: _Job) -> None:
        if job.drop_ws:
            logger.warning("standin.fault_drop_websocket", extra={"prompt_id": job.item.prompt_id})
            await self.drop_sockets()
        if job.restart:
            logger.warning("standin.fault_restart", extra={"prompt_id": job.item.prompt_id})
            self.spawn(self.restart(self.faults.restart_downtime_s))
            raise _Restarted()

    async def _run_node(
        self, job: _Job, node_id: str, node: Mapping[str, Any], values: dict[str, tuple[Any, ...]]
    ) -> None:
        self._check_interrupt()
        prompt_id = job.item.prompt_id
        spec = nodes.NODES[node["class_type"]]
        self.last_node_id = node_id
        self._progress_state(job, node_id, "running")
        if job.client_id is not None:
            self.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}, job.client_id)
        if spec.name in _LOADERS and not self.models_loaded:
            if self.faults.slow_first_job_s > 0:
                await asyncio.sleep(self.faults.slow_first_job_s)  # loading weights: not interruptible
            self.models_loaded = True
        own = nodes.own_seconds(node)  # a node that takes its own time (the test node)
        steps = self._steps_of(node)
        await self._spend(job, job.node_s + (0.0 if steps else own))
        for step in range(1, steps + 1):
            await self._spend(job, job.step_s + own / steps, step=True)
            # progress_state first, then progress (main.py hijack_progress); progress goes to everyone when the
            # prompt has no client_id.
            self._progress_state(job, node_id, "running", step, steps)
            data = {"value": step, "max": steps, "prompt_id": prompt_id, "node": node_id}
            self.send("progress", data, job.client_id)
        if job.error_node == node_id:
            raise _InjectedError(self.faults.execution_error_message, self.faults.execution_error_type)
        kwargs: dict[str, Any] = {}
        for name, val in node["inputs"].items():
            if isinstance(val, list) and len(val) == 2 and spec.find(name) is not None:
                kwargs[name] = values[str(val[0])][int(val[1])]
            elif spec.find(name) is not None:
                kwargs[name] = val
        ctx = nodes.NodeContext(
            node_id=node_id,
            input_dir=self.input_dir,
            output_dir=self.output_dir,
            prompt=job.item.prompt,
            extra_data=job.item.extra_data,
            save_metadata=self.config.save_metadata,
        )
        outputs, ui = await asyncio.to_thread(spec.run, ctx, kwargs)
        values[node_id] = outputs
        job.executed.append(node_id)
        if ui is not None:
            self._record_ui(job, node_id, ui)
        self._progress_state(job, node_id, "finished", 1, 1)

    def _write_history(self, job: _Job, success: bool) -> None:
        item = job.item
        entry = {
            "prompt": item.as_list(),
            "outputs": job.ui,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": job.messages,
            },
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in job.ui},
        }
        self.history.pop(item.prompt_id, None)
        self.history[item.prompt_id] = entry
        while len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))


class _InjectedError(RuntimeError):
    """The execution_error fault; reports the configured exception type name."""

    def __init__(self, message: str, type_name: str) -> None:
        super().__init__(message)
        self.standin_type = type_name


async def _send_text(ws: web.WebSocketResponse, text: str) -> None:
    if ws.closed:
        return
    try:
        await ws.send_str(text)
    except (ConnectionError, RuntimeError) as exc:
        logger.info("standin.ws_send_failed", extra={"error": str(exc)})


# --- HTTP handlers -----------------------------------------------------------------------------------------

STANDIN_KEY = web.AppKey("standin", Standin)


def _st(request: web.Request) -> Standin:
    return request.app[STANDIN_KEY]


def _top_error(type_: str, message: str, details: str) -> web.Response:
    body = {
        "error": {"type": type_, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    }
    return web.json_response(body, status=400)


async def _index(request: web.Request) -> web.Response:
    html = "<!doctype html><title>gpuctl ComfyUI stand-in</title><p>ComfyUI stand-in (CPU, not the model)</p>"
    return web.Response(text=html, content_type="text/html")


async def _post_prompt(request: web.Request) -> web.Response:
    st = _st(request)
    if st.faults.fail_http_500 > 0:
        st.faults.fail_http_500 -= 1
        logger.warning("standin.fault_http_500")
        return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
    json_data = await request.json()  # not JSON: aiohttp's generic 500, as in ComfyUI (§1)
    if "number" in json_data:
        number: float = float(json_data["number"])
    else:
        number = st.next_number(bool(json_data.get("front")))
    if "prompt" not in json_data:
        return _top_error("no_prompt", "No prompt provided", "No prompt provided")
    prompt_id = json_data.get("prompt_id")
    if prompt_id is None:
        prompt_id = str(uuid.uuid4())
    elif st.version >= (0, 25, 0):
        if not _is_canonical_uuid(prompt_id):
            return _top_error("invalid_prompt_id", "prompt_id must be a valid UUID", f"Invalid prompt_id: {prompt_id}")
    else:
        prompt_id = str(prompt_id)
    prompt = copy.deepcopy(json_data["prompt"])
    partial = json_data.get("partial_execution_targets")
    result = st.validate(prompt, partial)
    if not result.ok:
        logger.info("standin.prompt_invalid", extra={"error_type": (result.error or {}).get("type")})
        return web.json_response({"error": result.error, "node_errors": result.node_errors}, status=400)
    extra = dict(json_data.get("extra_data") or {})
    if "client_id" in json_data:
        extra["client_id"] = json_data["client_id"]
    extra["create_time"] = _now_ms()
    st.enqueue(number, prompt_id, prompt, extra, result.good_outputs)
    logger.info("standin.prompt_queued", extra={"prompt_id": prompt_id, "number": number})
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors})


def _is_canonical_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


async def _get_prompt(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": _st(request).queue_remaining()}})


async def _get_history(request: web.Request) -> web.Response:
    st = _st(request)
    query = request.rel_url.query
    max_items = int(query["max_items"]) if "max_items" in query else None
    offset = int(query["offset"]) if "offset" in query else -1
    if offset < 0 and max_items is not None:
        offset = len(st.history) - max_items
    out: dict[str, Any] = {}
    for i, (key, entry) in enumerate(st.history.items()):
        if i >= offset:
            out[key] = entry
            if max_items is not None and len(out) >= max_items:
                break
    return web.json_response(out)


async def _get_history_item(request: web.Request) -> web.Response:
    st = _st(request)
    prompt_id = request.match_info["prompt_id"]
    entry = st.history.get(prompt_id)
    return web.json_response({prompt_id: entry} if entry is not None else {})


async def _post_history(request: web.Request) -> web.Response:
    st = _st(request)
    json_data = await request.json()
    if json_data.get("clear"):
        st.history.clear()
    for prompt_id in json_data.get("delete", []):
        st.history.pop(prompt_id, None)
    return web.Response(status=200)


async def _get_queue(request: web.Request) -> web.Response:
    st = _st(request)
    running = [st.running.as_list()] if st.running is not None else []
    pending = [entry[3].as_list() for entry in st.pending]
    return web.json_response({"queue_running": running, "queue_pending": pending})


async def _post_queue(request: web.Request) -> web.Response:
    st = _st(request)
    json_data = await request.json()
    if json_data.get("clear"):
        st.clear_pending()
    for prompt_id in json_data.get("delete", []):
        st.delete_pending(prompt_id)
    return web.Response(status=200)


async def _post_interrupt(request: web.Request) -> web.Response:
    try:
        json_data = await request.json()
    except json.JSONDecodeError:
        json_data = {}
    prompt_id = json_data.get("prompt_id") if isinstance(json_data, dict) else None
    _st(request).interrupt(prompt_id if isinstance(prompt_id, str) else None)
    return web.Response(status=200)


async def _post_free(request: web.Request) -> web.Response:
    st = _st(request)
    json_data = await request.json()
    if json_data.get("unload_models") or json_data.get("free_memory"):
        st.models_loaded = False
    if json_data.get("free_memory"):
        st.cache.clear()
    return web.Response(status=200)


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 0, 0


async def _system_stats(request: web.Request) -> web.Response:
    st = _st(request)
    total, free = _memory()
    system = {
        "os": sys.platform if st.version >= (0, 26, 0) else os.name,
        "ram_total": total,
        "ram_free": free,
        "comfyui_version": st.config.comfyui_version,
        "required_frontend_version": "gpuctl-standin",
        "installed_templates_version": "gpuctl-standin",
        "required_templates_version": "gpuctl-standin",
        "python_version": sys.version,
        "pytorch_version": "none (gpuctl stand-in)",
        "embedded_python": False,
        "argv": list(sys.argv),
        "comfy_package_versions": {},
        "deploy_environment": "gpuctl-standin",
    }
    device = {
        "name": "cpu (gpuctl ComfyUI stand-in)",
        "type": "cpu",
        "index": None,
        "vram_total": total,
        "vram_free": free,
        "torch_vram_total": 0,
        "torch_vram_free": 0,
    }
    return web.json_response({"system": system, "devices": [device]})


async def _object_info(request: web.Request) -> web.Response:
    st = _st(request)
    return web.json_response({name: nodes.object_info(spec, st.catalog) for name, spec in nodes.NODES.items()})


async def _object_info_class(request: web.Request) -> web.Response:
    st = _st(request)
    name = request.match_info["node_class"]
    spec = nodes.NODES.get(name)
    return web.json_response({name: nodes.object_info(spec, st.catalog)} if spec is not None else {})


async def _models(request: web.Request) -> web.Response:
    return web.json_response(sorted(_st(request).catalog.models))


async def _models_folder(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    models = _st(request).catalog.models
    if folder not in models:
        return web.Response(status=404)
    return web.json_response(sorted(models[folder]))


async def _embeddings(request: web.Request) -> web.Response:
    return web.json_response([])


def _feature_flags(st: Standin) -> dict[str, Any]:
    return {"supports_preview_metadata": True, "max_upload_size": float(st.config.max_upload_size)}


async def _features(request: web.Request) -> web.Response:
    return web.json_response(_feature_flags(_st(request)))


def _dir_by_type(st: Standin, type_: str | None) -> Path | None:
    return {"input": st.input_dir, "output": st.output_dir, "temp": st.temp_dir}.get(type_ or "output")


async def _view(request: web.Request) -> web.StreamResponse:
    st = _st(request)
    query = request.rel_url.query
    if "filename" not in query:
        return web.Response(status=404)
    filename = query["filename"]
    base: Path | None = None
    for suffix, type_ in ((" [output]", "output"), (" [input]", "input"), (" [temp]", "temp")):
        if filename.endswith(suffix):
            filename, base = filename[: -len(suffix)], _dir_by_type(st, type_)
            break
    if not filename or filename.startswith("/") or ".." in filename:
        return web.Response(status=400)
    if base is None:
        base = _dir_by_type(st, query.get("type", "output"))
        if base is None:
            return web.Response(status=400)
    folder = base
    if "subfolder" in query:
        folder = (base / query["subfolder"]).resolve()
        if not folder.is_relative_to(base.resolve()):
            return web.Response(status=403)
    path = folder / Path(filename).name
    if not path.is_file():
        return web.Response(status=404)
    channel = query.get("channel", "rgba")
    preview = query.get("preview")
    if preview or channel in ("rgb", "a"):
        body, content_type = await asyncio.to_thread(_reencode, path, channel, preview)
        return web.Response(body=body, content_type=content_type)
    headers = {"Content-Disposition": f'filename="{path.name}"'}
    if path.suffix.lower() in (".html", ".htm", ".js", ".css"):
        headers["Content-Type"] = "application/octet-stream"
    return web.FileResponse(path, headers=headers)


def _reencode(path: Path, channel: str, preview: str | None) -> tuple[bytes, str]:
    with Image.open(path) as img:
        if channel == "a":
            out = img.convert("RGBA").getchannel("A").convert("L")
        elif channel == "rgb":
            out = img.convert("RGB")
        else:
            out = img.convert("RGBA")
        buf = io.BytesIO()
        if preview:
            fmt, _, quality = preview.partition(";")
            fmt = "webp" if fmt == "webp" else "jpeg"
            out = out.convert("RGB") if fmt == "jpeg" else out
            out.save(buf, format=fmt.upper(), quality=int(quality or 90))
            return buf.getvalue(), f"image/{fmt}"
        out.save(buf, format="PNG")
        return buf.getvalue(), "image/png"


async def _upload_image(request: web.Request) -> web.Response:
    st = _st(request)
    post = await request.post()
    image = post.get("image")
    upload_type = post.get("type")
    # Any other type is a crash (500) in ComfyUI: the local variable is never set (§6).
    base = {None: st.input_dir, "input": st.input_dir, "temp": st.temp_dir, "output": st.output_dir}[
        upload_type if isinstance(upload_type, str) else None
    ]
    if not isinstance(image, web.FileField) or not image.filename:
        return web.Response(status=400)
    subfolder = str(post.get("subfolder", ""))
    folder = (base / os.path.normpath(subfolder)).resolve()
    filename = image.filename
    filepath = (folder / filename).resolve()
    if not filepath.is_relative_to(base.resolve()):
        return web.Response(status=400)
    folder.mkdir(parents=True, exist_ok=True)
    data = image.file.read()
    overwrite = post.get("overwrite")
    duplicate = False
    if overwrite not in ("true", "1"):
        stem, ext = Path(filename).stem, Path(filename).suffix
        i = 1
        digest = hashlib.sha256(data).digest()
        while filepath.exists():
            if hashlib.sha256(filepath.read_bytes()).digest() == digest:
                duplicate = True
                break
            filename = f"{stem} ({i}){ext}"
            filepath = folder / filename
            i += 1
    if not duplicate:
        await asyncio.to_thread(filepath.write_bytes, data)
    logger.info("standin.upload", extra={"upload_name": filename, "subfolder": subfolder, "duplicate": duplicate})
    return web.json_response({"name": filename, "subfolder": subfolder, "type": upload_type or "input"})


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    st = _st(request)
    ws = web.WebSocketResponse(max_msg_size=0)
    sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
    await ws.prepare(request)
    st.register_socket(sid, ws, request.transport)
    try:
        status = {"status": {"exec_info": {"queue_remaining": st.queue_remaining()}}, "sid": sid}
        await _send_text(ws, json.dumps({"type": "status", "data": status}))
        if st.client_id == sid and st.last_node_id is not None:
            await _send_text(ws, json.dumps({"type": "executing", "data": {"node": st.last_node_id}}))
        first = True
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and first:
                with contextlib.suppress(ValueError, AttributeError):
                    if json.loads(msg.data).get("type") == "feature_flags":
                        await _send_text(ws, json.dumps({"type": "feature_flags", "data": _feature_flags(st)}))
            first = False
    finally:
        st.unregister_socket(sid, ws)
    return ws


# --- ComfyUI v0.6+ jobs API (the one endpoint that tells "queued/running" from "unknown") ------------------


def _job_dict(st: Standin, prompt_id: str) -> dict[str, Any] | None:
    for entry in st.pending:
        if entry[1] == prompt_id:
            item = entry[3]
            return {"id": prompt_id, "status": "pending", "priority": item.number,
                    "create_time": item.extra_data.get("create_time"), "outputs_count": 0}  # fmt: skip
    if st.running is not None and st.running.prompt_id == prompt_id:
        item = st.running
        return {"id": prompt_id, "status": "in_progress", "priority": item.number,
                "create_time": item.extra_data.get("create_time"), "outputs_count": 0}  # fmt: skip
    entry_h = st.history.get(prompt_id)
    if entry_h is None:
        return None
    status = entry_h["status"]
    messages = status["messages"]
    if status["status_str"] == "success":
        state = "completed"
    elif any(m[0] == "execution_interrupted" for m in messages):
        state = "cancelled"
    else:
        state = "failed"
    outputs = entry_h["outputs"]
    job: dict[str, Any] = {
        "id": prompt_id,
        "status": state,
        "priority": entry_h["prompt"][0],
        "create_time": entry_h["prompt"][3].get("create_time"),
        "execution_start_time": messages[0][1]["timestamp"] if messages else None,
        "execution_end_time": messages[-1][1]["timestamp"] if messages else None,
        "outputs_count": sum(len(v.get("images", [])) for v in outputs.values()),
        "outputs": outputs,
        "execution_status": status,
        "workflow": {"prompt": entry_h["prompt"][2], "extra_data": entry_h["prompt"][3]},
    }
    errors = [m[1] for m in messages if m[0] == "execution_error"]
    if errors:
        job["execution_error"] = errors[-1]
    return {k: v for k, v in job.items() if v is not None}


async def _get_job(request: web.Request) -> web.Response:
    job = _job_dict(_st(request), request.match_info["job_id"])
    if job is None:
        return web.json_response({"error": "Job not found"}, status=404)
    return web.json_response(job)


async def _cancel_job(request: web.Request) -> web.Response:
    st = _st(request)
    prompt_id = request.match_info["job_id"]
    state = st.state_of(prompt_id)
    if state == "running":
        cancelled = st.interrupt(prompt_id)
    elif state == "pending":
        cancelled = st.delete_pending(prompt_id)
    else:
        cancelled = False
    return web.json_response({"cancelled": cancelled})


# --- stand-in admin ----------------------------------------------------------------------------------------


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(_st(request).faults.to_dict())


async def _post_faults(request: web.Request) -> web.Response:
    st = _st(request)
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("body must be a JSON object of fault settings")
        st.faults.update(changes)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return web.json_response({"error": str(exc)}, status=400)
    if changes.get("slow_first_job_s"):
        st.models_loaded = False
    logger.info("standin.faults_set", extra={"faults": st.faults.to_dict()})
    return web.json_response(st.faults.to_dict())


async def _post_restart(request: web.Request) -> web.Response:
    st = _st(request)
    body = await request.json() if request.can_read_body else {}
    downtime = float(body.get("downtime_s", 0.0)) if isinstance(body, dict) else 0.0
    await st.restart(downtime)
    return web.Response(status=200)


# --- app ---------------------------------------------------------------------------------------------------


@web.middleware
async def _origin_check(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """ComfyUI's loopback protection: Host/Origin mismatch or a cross-site fetch -> 403 (§1)."""
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return web.Response(status=403)
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host and origin:
        host_name = urlsplit(f"//{host}").hostname
        origin_name = urlsplit(origin).hostname
        if _is_loopback(host_name) and host_name != origin_name:
            return web.Response(status=403)
    return await handler(request)


def _is_loopback(name: str | None) -> bool:
    if name is None:
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _resolve_dirs(config: StandinConfig) -> tuple[Path, Path, Path]:
    dirs = []
    for name, given in (("input", config.input_dir), ("output", config.output_dir), ("temp", config.temp_dir)):
        if given is None:
            raise ValueError(f"StandinConfig.{name}_dir is not set (standin_dirs.working_dirs fills it in)")
        given.mkdir(parents=True, exist_ok=True)
        dirs.append(given.resolve())
    return dirs[0], dirs[1], dirs[2]


@contextlib.contextmanager
def _with_working_dirs(config: StandinConfig) -> Iterator[StandinConfig]:
    """``config`` with every folder set; the ones it lacked live in a temporary folder removed on exit."""
    with standin_dirs.working_dirs(config.input_dir, config.output_dir, config.temp_dir) as (inp, out, tmp):
        yield dataclasses.replace(config, input_dir=inp, output_dir=out, temp_dir=tmp)


def build_app(config: StandinConfig) -> web.Application:
    """The stand-in as an aiohttp application (worker and publisher start with the app)."""
    from gpuctl.local import standin_unified  # local import: the unified API depends on this module

    input_dir, output_dir, temp_dir = _resolve_dirs(config)
    st = Standin(config, input_dir, output_dir, temp_dir)
    app = web.Application(client_max_size=config.max_upload_size, middlewares=[_origin_check])
    app[STANDIN_KEY] = st
    comfy_routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("GET", "/", _index),
        ("GET", "/ws", _websocket),
        ("POST", "/prompt", _post_prompt),
        ("GET", "/prompt", _get_prompt),
        ("GET", "/history", _get_history),
        ("POST", "/history", _post_history),
        ("GET", "/history/{prompt_id}", _get_history_item),
        ("GET", "/queue", _get_queue),
        ("POST", "/queue", _post_queue),
        ("POST", "/interrupt", _post_interrupt),
        ("POST", "/free", _post_free),
        ("GET", "/view", _view),
        ("POST", "/upload/image", _upload_image),
        ("GET", "/system_stats", _system_stats),
        ("GET", "/object_info", _object_info),
        ("GET", "/object_info/{node_class}", _object_info_class),
        ("GET", "/models", _models),
        ("GET", "/models/{folder}", _models_folder),
        ("GET", "/embeddings", _embeddings),
        ("GET", "/features", _features),
    ]
    for method, path, handler in comfy_routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path if path != "/" else "/api/", handler)
    if st.version >= (0, 6, 0):
        app.router.add_get("/api/jobs/{job_id}", _get_job)
    if st.version >= (0, 26, 0):
        app.router.add_post("/api/jobs/{job_id}/cancel", _cancel_job)
    app.router.add_get("/_standin/faults", _get_faults)
    app.router.add_post("/_standin/faults", _post_faults)
    app.router.add_post("/_standin/restart", _post_restart)
    standin_unified.register(app, st)

    async def on_startup(app: web.Application) -> None:
        await st.start()

    async def on_shutdown(app: web.Application) -> None:
        await st.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    logger.info(
        "standin.configured",
        extra={
            "input_dir": str(input_dir),
            "output_dir": str(output_dir),
            "comfyui_version": config.comfyui_version,
        },
    )
    return app


async def _run(config: StandinConfig, started: Callable[[str, web.Application], None], stop: asyncio.Event) -> None:
    """Serve ``config`` until ``stop`` is set; ``started`` gets the base URL once the port is bound."""
    app = build_app(config)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, shutdown_timeout=2.0)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()  # the worker started with the app: stop it too (a port in use …)
        raise
    sockname = runner.addresses[0]
    host, port = sockname[0], sockname[1]
    holder = {"site": site}

    async def downtime(seconds: float) -> None:
        # A restart keeps the port closed for a while: clients see "connection refused", as in real life.
        await holder["site"].stop()
        await asyncio.sleep(seconds)
        new_site = web.TCPSite(runner, host, port, shutdown_timeout=2.0)
        await new_site.start()
        holder["site"] = new_site

    app[STANDIN_KEY].site_control = downtime
    url_host = f"[{host}]" if ":" in host else host
    started(f"http://{url_host}:{port}", app)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(config: StandinConfig) -> None:
    """Run the stand-in in the foreground until SIGINT/SIGTERM. Logs the URL; prints nothing.

    A working folder it had to make (no ``--input-dir``/``--output-dir``/``--temp-dir``) is removed when it
    stops, by a signal or otherwise.
    """

    async def main_async(config: StandinConfig) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)

        def started(url: str, app: web.Application) -> None:
            st = app[STANDIN_KEY]
            logger.info(
                "standin.listening",
                extra={"url": url, "input_dir": str(st.input_dir), "output_dir": str(st.output_dir)},
            )

        await _run(config, started, stop)

    # Until the event loop takes the signals over (and after it gives them back), SIGTERM unwinds as an
    # exception, so the working folder is still removed.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with _with_working_dirs(config) as ready:
            # asyncio.run also waits for Pillow work in executor threads: nothing writes after the removal.
            asyncio.run(main_async(ready))
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


class StandinServer:
    """The stand-in on a background thread, for tests and benchmarks.

    ``start()`` returns the base URL (with the real port when ``config.port`` is 0); ``stop()`` shuts it down
    and removes the temporary directory it created. Use it as a context manager.
    """

    def __init__(self, config: StandinConfig | None = None) -> None:
        self.config = config or StandinConfig(port=0)
        self._dirs = contextlib.ExitStack()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._app: web.Application | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.base_url = ""

    def start(self, timeout: float = 10.0) -> str:
        if self._thread is not None:
            raise RuntimeError("StandinServer already started")
        self.config = self._dirs.enter_context(_with_working_dirs(self.config))
        self._thread = threading.Thread(target=self._thread_main, name="comfyui-standin", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError("the ComfyUI stand-in did not start in time")
        if self._error is not None:
            self.stop()
            raise RuntimeError("the ComfyUI stand-in failed to start") from self._error
        return self.base_url

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = asyncio.Event()

        def started(url: str, app: web.Application) -> None:
            self.base_url = url
            self._app = app
            self._ready.set()

        try:
            loop.run_until_complete(_run(self.config, started, self._stop))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            # Let Pillow work still running in worker threads finish before the loop goes away.
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    @property
    def standin(self) -> Standin:
        if self._app is None:
            raise RuntimeError("StandinServer not started")
        return self._app[STANDIN_KEY]

    @property
    def input_dir(self) -> Path:
        return self.standin.input_dir

    @property
    def output_dir(self) -> Path:
        return self.standin.output_dir

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def _call(self, fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 10.0) -> Any:
        if self._loop is None:
            raise RuntimeError("StandinServer not started")
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """Change fault switches on the running server (same names as ``StandinFaults``)."""

        async def apply() -> dict[str, Any]:
            self.standin.faults.update(changes)
            if changes.get("slow_first_job_s"):
                self.standin.models_loaded = False
            return self.standin.faults.to_dict()

        result: dict[str, Any] = self._call(apply)
        return result

    def restart(self, downtime_s: float = 0.0) -> None:
        """Simulate a ComfyUI restart now."""
        self._call(lambda: self.standin.restart(downtime_s), timeout=10.0 + downtime_s)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._thread = None
        self._dirs.close()

    def __enter__(self) -> StandinServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- command line ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gpuctl.local.comfyui_standin",
        description="Run a CPU stand-in for ComfyUI (HTTP + WebSocket protocol, not the model) on loopback.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8188, help="port; 0 picks a free one (logged)")
    p.add_argument("--seconds-per-job", type=float, default=2.0, help="total run time of one job")
    p.add_argument("--steps", type=int, default=None, help="progress events per sampler (default: its steps)")
    p.add_argument("--input-dir", type=Path, default=None, help="ComfyUI input dir (default: a temp dir)")
    p.add_argument("--output-dir", type=Path, default=None, help="ComfyUI output dir (default: a temp dir)")
    p.add_argument("--temp-dir", type=Path, default=None, help="ComfyUI temp dir (default: a temp dir)")
    p.add_argument("--comfyui-version", default=DEFAULT_VERSION,
                   help=f"version to report and emulate (default {DEFAULT_VERSION})")
    p.add_argument("--no-cache", action="store_true", help="re-run every node of every prompt")
    p.add_argument("--output-bucket", default=None, help="unified API: upload results to this S3 bucket")
    p.add_argument("--output-prefix", default="results/", help="unified API: key prefix for results")
    p.add_argument("--cdn-domain", default=None,
                   help="unified API: with --output-bucket, report results as https://<domain>/<key>")
    p.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL / boto3's)")
    p.add_argument("--unified-blocking", action="store_true",
                   help="unified API: answer nothing while a job executes, as the running service does")
    faults = p.add_argument_group("fault switches (also at run time: POST /_standin/faults)")
    faults.add_argument("--fail-http-500", type=int, default=0, metavar="N", help="next N POST /prompt -> 500")
    faults.add_argument("--drop-websocket", type=int, default=0, metavar="N", help="cut WebSockets in N jobs")
    faults.add_argument("--execution-error", type=int, default=0, metavar="N", help="next N jobs fail")
    faults.add_argument("--execution-error-node", default=None, help="node id or class_type that fails")
    faults.add_argument("--execution-error-message", default=None, help="message of the injected error")
    faults.add_argument("--restart", type=int, default=0, metavar="N", help="restart halfway through N jobs")
    faults.add_argument("--restart-downtime", type=float, default=0.0, metavar="S", help="port closed S seconds")
    faults.add_argument("--slow-first-job", type=float, default=0.0, metavar="S", help="extra S on first job")
    faults.add_argument("--history-delay", type=float, default=0.0, metavar="S", help="late history write")
    faults.add_argument(
        "--stale-ws-cleanup", action="store_true", help="reproduce ComfyUI's same-clientId socket cleanup bug"
    )
    faults.add_argument("--interrupt-lag", type=float, default=0.0, metavar="S",
                        help="honour an interrupt only at a check point S seconds after it was asked for")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return p


def config_from_args(args: argparse.Namespace) -> StandinConfig:
    faults = StandinFaults(
        fail_http_500=args.fail_http_500,
        drop_websocket=args.drop_websocket,
        execution_error=args.execution_error,
        execution_error_node=args.execution_error_node,
        restart=args.restart,
        restart_downtime_s=args.restart_downtime,
        slow_first_job_s=args.slow_first_job,
        history_delay_s=args.history_delay,
        stale_ws_cleanup=args.stale_ws_cleanup,
        interrupt_lag_s=args.interrupt_lag,
    )
    if args.execution_error_message:
        faults.execution_error_message = args.execution_error_message
    return StandinConfig(
        host=args.host,
        port=args.port,
        seconds_per_job=args.seconds_per_job,
        steps=args.steps,
        input_dir=args.input_dir,
        output_dir=args.output_dir,
        temp_dir=args.temp_dir,
        comfyui_version=args.comfyui_version,
        cache=not args.no_cache,
        faults=faults,
        output_bucket=args.output_bucket,
        output_prefix=args.output_prefix,
        cdn_domain=args.cdn_domain,
        s3_endpoint_url=args.s3_endpoint_url,
        unified_blocking=args.unified_blocking,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gpuctl.local.comfyui_standin``; logs go to stderr."""
    args = _parser().parse_args(argv)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_ExtraFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
        # One access-log line per request drowns the events that matter.
        logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    serve(config_from_args(args))
    return 0


_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _ExtraFormatter(logging.Formatter):
    """Appends a record's ``extra=`` fields as ``key=value`` so that the bound URL shows on the console."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        return base + "".join(f" {k}={v}" for k, v in extras.items())


if __name__ == "__main__":
    raise SystemExit(main())
