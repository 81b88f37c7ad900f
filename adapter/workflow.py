"""Workflow templates (ComfyUI API format) and filling them from a job's request.

Each job type has two files in ``adapter/workflows/`` (a directory named by ``GPUCTL_WORKFLOWS_DIR``
overrides either, file by file):

* ``<job-type>.json``: the API-format graph, exported from the pinned ComfyUI version;
* ``<job-type>.map.json``: which request field goes into which node input::

      {"output_node": "80",                      # the SaveImage node whose image is the result
       "images": {"image_url": "31"},            # request field -> LoadImage node; an optional image
                                                 # that is absent removes its node and every link to it
       "inputs": {"steps": [["14", "steps"]]}}   # request field -> [[node id, input name], ...]

Filling is pure: no I/O, no ComfyUI, so it is tested on its own.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuctl.models import CameraAngleRequest, JobRequest, JobType

__all__ = ["PACKAGED_DIR", "WorkflowError", "WorkflowTemplate", "load_templates", "request_values"]

PACKAGED_DIR = Path(__file__).parent / "workflows"


class WorkflowError(Exception):
    """A template or its mapping is unusable (a configuration error, found at start-up)."""


@dataclass(frozen=True)
class WorkflowTemplate:
    """One job type's graph and its request-field mapping, checked against each other."""

    job_type: JobType
    graph: Mapping[str, Any]
    output_node: str
    images: Mapping[str, str]
    inputs: Mapping[str, list[tuple[str, str]]]
    source: str

    @property
    def node_classes(self) -> frozenset[str]:
        return frozenset(str(node["class_type"]) for node in self.graph.values())

    def fill(self, values: Mapping[str, Any], images: Mapping[str, str], filename_prefix: str) -> dict[str, Any]:
        """The graph to POST: ``values`` by request field, ``images`` = request field -> uploaded name.

        Raises:
            WorkflowError: a required image (one without a value) would be left as the placeholder.
        """
        graph: dict[str, Any] = copy.deepcopy(dict(self.graph))
        for field, node_id in self.images.items():
            name = images.get(field)
            if name:
                graph[node_id]["inputs"]["image"] = name
            elif field == "image_url":
                raise WorkflowError(f"{self.job_type.value}: the main image ({field}) is missing")
            else:
                _remove_node(graph, node_id)
        for field, targets in self.inputs.items():
            if field not in values or values[field] is None:
                continue
            for node_id, input_name in targets:
                graph[node_id]["inputs"][input_name] = values[field]
        graph[self.output_node]["inputs"]["filename_prefix"] = filename_prefix
        return graph


def _remove_node(graph: dict[str, Any], node_id: str) -> None:
    """Drop a node and every input that links to it (only optional inputs may link to such a node)."""
    graph.pop(node_id, None)
    for node in graph.values():
        inputs = node.get("inputs", {})
        for name in [n for n, v in inputs.items() if _is_link(v) and str(v[0]) == node_id]:
            del inputs[name]


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def request_values(request: JobRequest, seed: int) -> dict[str, Any]:
    """The values a template's mapping can refer to: the request's fields, the prompt and the seed."""
    values = request.to_body()
    if isinstance(request, CameraAngleRequest):
        values["prompt"] = request.effective_prompt()
    values["seed"] = request.seed if request.seed is not None else seed
    return values


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkflowError(f"cannot read {path}: {exc}") from None


def _pick(name: str, override_dir: Path | None) -> Path:
    if override_dir is not None and (override_dir / name).is_file():
        return override_dir / name
    return PACKAGED_DIR / name


def load_template(job_type: JobType, override_dir: Path | None = None) -> WorkflowTemplate:
    """Load and cross-check one job type's graph and mapping.

    Raises:
        WorkflowError: a file is missing or malformed, or the mapping names a node the graph lacks.
    """
    graph_path = _pick(f"{job_type.value}.json", override_dir)
    map_path = _pick(f"{job_type.value}.map.json", override_dir)
    graph = _read_json(graph_path)
    mapping = _read_json(map_path)
    where = f"{graph_path} / {map_path}"
    if not isinstance(graph, dict) or not graph:
        raise WorkflowError(f"{graph_path}: not an API-format graph (a JSON object of nodes)")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs"), dict):
            raise WorkflowError(f"{graph_path}: node {node_id} needs class_type and inputs (API format)")
    if not isinstance(mapping, dict):
        raise WorkflowError(f"{map_path}: not a JSON object")
    output_node = str(mapping.get("output_node", ""))
    if output_node not in graph:
        raise WorkflowError(f"{where}: output_node {output_node!r} is not in the graph")
    images = {str(k): str(v) for k, v in dict(mapping.get("images", {})).items()}
    if "image_url" not in images:
        raise WorkflowError(f"{where}: the mapping must place image_url on a LoadImage node")
    for field, node_id in images.items():
        if graph.get(node_id, {}).get("class_type") != "LoadImage":
            raise WorkflowError(f"{where}: {field} must map to a LoadImage node, not {node_id!r}")
    inputs: dict[str, list[tuple[str, str]]] = {}
    for field, targets in dict(mapping.get("inputs", {})).items():
        pairs: list[tuple[str, str]] = []
        for target in targets:
            if not (isinstance(target, list) and len(target) == 2 and str(target[0]) in graph):
                raise WorkflowError(f"{where}: {field} -> {target!r} does not name a node of the graph")
            pairs.append((str(target[0]), str(target[1])))
        inputs[str(field)] = pairs
    return WorkflowTemplate(job_type, graph, output_node, images, inputs, str(graph_path))


def load_templates(override_dir: Path | None = None) -> dict[JobType, WorkflowTemplate]:
    """Every job type's template (packaged, or from ``override_dir`` where it has the file)."""
    return {job_type: load_template(job_type, override_dir) for job_type in JobType}
