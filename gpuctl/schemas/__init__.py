"""The JSON Schema of every ``--output json`` document (``output.schema.json``, draft 2020-12).

One file, one definition (``$defs``) per document; :data:`COMMANDS` says which command prints which. The tests
validate every command's real output against it (tests/functional/test_cli_output.py), so the schema cannot drift
from what gpuctl prints.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

__all__ = ["COMMANDS", "definition", "load"]

#: Command → the ``$defs`` entry its ``--output json`` document follows.
COMMANDS: dict[str, str] = {
    "submit camera-angle": "submitted",
    "submit qwen-image-edit": "submitted",
    "submit --from": "batch",
    "status": "job",
    "watch": "watch_line",
    "result": "result_file",
    "result --url": "result_url",
    "jobs list": "jobs_page",
    "jobs cancel": "job_cancelled",
    "jobs retry": "job",
    "instance status": "instance_status",
    "instance start": "instance_change",
    "instance stop": "instance_change",
    "instance hold": "hold",
    "instance release": "hold_released",
    "instance why-stopped": "why_stopped",
    "instance decisions": "decisions",
    "fleet status": "fleet_status",
    "fleet scale": "fleet_scale",
    "queue stats": "queue_stats",
    "queue redrive": "queue_redrive",
    "queue purge": "queue_purge",
    "config show": "config_show",
    "deploy": "deploy",
    "destroy": "destroy",
    "stack status": "stack_status",
    "stack outputs": "stack_outputs",
    "local up": "local_up",
    "local status": "local_status",
    "local down": "local_down",
    "demo": "demo",
    "adapter check": "adapter_check",
    "cost report": "cost_report",
    "cost simulate": "cost_simulate",
    "doctor": "doctor",
}


@functools.cache
def load() -> dict[str, Any]:
    """The whole schema file."""
    text = resources.files(__package__).joinpath("output.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def definition(name: str) -> dict[str, Any]:
    """A self-contained schema for one document (``name`` is a ``$defs`` key or a command of :data:`COMMANDS`)."""
    schema = load()
    key = COMMANDS.get(name, name)
    if key not in schema["$defs"]:
        raise KeyError(f"no schema for {name!r}")
    return {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{key}"}
